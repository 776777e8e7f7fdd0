FROM parent
